# Step 1: which raws each site needs.


rule plan:
    input:
        unpack(plan_inputs),
    output:
        placement=LAYOUT.placement_table,
        summary=LAYOUT.placement_summary,
        marker=LAYOUT.placement_marker,
    log:
        LAYOUT.rule_log("plan"),
    localrule: True
    script:
        "../scripts/plan.py"
