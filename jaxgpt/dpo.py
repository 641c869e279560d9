"""`python -m jaxgpt.dpo`: the command jaxgpt.cli.dpo (its library: jaxgpt.training.dpo)."""

if __name__ == "__main__":
    from jaxgpt.cli.dpo import main

    raise SystemExit(main())
