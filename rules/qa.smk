# The single-site reference and the campaign QA, both at the central site.


rule reference:
    input:
        survey=survey_marker(),
    output:
        marker=f"{MARKERS}/reference/reference.json",
    log:
        f"{LOGS}/reference.log",
        pipetask=f"{LOGS}/reference.pipetask.log",
    script:
        "../scripts/reference.py"


rule qa:
    input:
        reference=f"{MARKERS}/reference/reference.json",
        final=[handoff_marker("final", site) for site in PROCESSING],
        central=[stage_marker(CENTRAL, stage.name) for stage in campaign.stages if stage.is_central],
    output:
        marker=f"{MARKERS}/qa/qa.json",
    params:
        # Not an output: Snakemake deletes a failed job's outputs, and a failed QA table is the one to read.
        table=f"{LOGS}/qa/qa.csv",
    log:
        f"{LOGS}/qa.log",
    script:
        "../scripts/qa.py"
