"""`python -m jaxgpt.harness` runs the CLI (jaxgpt.cli.harness); no library module imports it."""

import runpy

runpy.run_module("jaxgpt.cli.harness", run_name="__main__")
