"""`python -m jaxgpt.sample`: the command jaxgpt.cli.sample (its library: jaxgpt.decode.sample)."""

if __name__ == "__main__":
    from jaxgpt.cli.sample import main

    raise SystemExit(main())
