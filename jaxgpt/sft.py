"""`python -m jaxgpt.sft`: the command jaxgpt.cli.sft (its library: jaxgpt.training.sft)."""

if __name__ == "__main__":
    from jaxgpt.cli.sft import main

    raise SystemExit(main())
