"""Snakemake shim: record that every piece of a hand-off for a site has been sent."""

from multisite.workflow import run_rule

run_rule(snakemake, lambda campaign: {"pieces": [str(path) for path in snakemake.input.pieces]})
