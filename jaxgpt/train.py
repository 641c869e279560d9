"""`python -m jaxgpt.train`: the command jaxgpt.cli.train (its library: jaxgpt.training.pretrain)."""

if __name__ == "__main__":
    from jaxgpt.cli.train import main

    raise SystemExit(main())
