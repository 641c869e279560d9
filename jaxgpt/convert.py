"""`python -m jaxgpt.convert`: the command jaxgpt.cli.convert (its library: jaxgpt.formats.hf, .llama, .nanogpt)."""

if __name__ == "__main__":
    from jaxgpt.cli.convert import main

    raise SystemExit(main())
