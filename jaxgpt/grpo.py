"""`python -m jaxgpt.grpo`: the command jaxgpt.cli.grpo (its library: jaxgpt.training.grpo)."""

if __name__ == "__main__":
    from jaxgpt.cli.grpo import main

    raise SystemExit(main())
