"""`python -m jaxgpt.tokenizer`: the command jaxgpt.cli.tokenizer (its library: jaxgpt.tokenizers.tokenizer)."""

if __name__ == "__main__":
    from jaxgpt.cli.tokenizer import main

    raise SystemExit(main())
