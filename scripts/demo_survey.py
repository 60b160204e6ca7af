"""Snakemake shim: write the synthetic demo survey into the central repository."""

from multisite.sites import make_demo_survey
from multisite.workflow import run_rule

run_rule(snakemake, make_demo_survey)
