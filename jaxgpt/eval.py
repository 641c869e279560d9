"""`python -m jaxgpt.eval`: the command jaxgpt.cli.eval (its library: jaxgpt.evaluate.scoring)."""

if __name__ == "__main__":
    from jaxgpt.cli.eval import main

    raise SystemExit(main())
