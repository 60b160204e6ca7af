# The single-site reference and the campaign QA, both at the central site.


rule reference:
    input:
        survey=TARGETS.survey_marker(),
    output:
        marker=LAYOUT.reference_marker,
    log:
        LAYOUT.rule_log("reference"),
        pipetask=LAYOUT.reference_pipetask_log,
    script:
        "../scripts/reference.py"


rule qa:
    input:
        **TARGETS.qa_inputs(),
    output:
        marker=LAYOUT.qa_marker,
    params:
        # Not an output: Snakemake deletes a failed job's outputs, and a failed QA table is the one to read.
        table=LAYOUT.qa_table,
    log:
        LAYOUT.rule_log("qa"),
    script:
        "../scripts/qa.py"
