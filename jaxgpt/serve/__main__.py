"""`python -m jaxgpt.serve` runs the CLI (jaxgpt.cli.serve); no library module imports it."""

import runpy

runpy.run_module("jaxgpt.cli.serve", run_name="__main__")
