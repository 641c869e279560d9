"""`python -m jaxgpt.chat`: the command jaxgpt.cli.chat (its library: jaxgpt.decode.chat)."""

if __name__ == "__main__":
    from jaxgpt.cli.chat import main

    raise SystemExit(main())
