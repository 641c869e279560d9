"""`python -m jaxgpt.prepare`: the command jaxgpt.cli.prepare (its library: jaxgpt.data.prepare)."""

if __name__ == "__main__":
    from jaxgpt.cli.prepare import main

    raise SystemExit(main())
