"""`python -m jaxgpt.quantize`: the command jaxgpt.cli.quantize (its library: jaxgpt.formats.quantize)."""

if __name__ == "__main__":
    from jaxgpt.cli.quantize import main

    raise SystemExit(main())
