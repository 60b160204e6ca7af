# Step 1: which raws each site needs.


rule plan:
    input:
        unpack(plan_inputs),
    output:
        placement=f"{MARKERS}/placement/raws.tsv",
        summary=f"{MARKERS}/placement/summary.tsv",
        marker=f"{MARKERS}/placement/plan.json",
    log:
        f"{LOGS}/plan.log",
    localrule: True
    script:
        "../scripts/plan.py"
