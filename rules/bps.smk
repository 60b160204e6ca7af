# Step 4: the BPS submit YAML of every chunk of every stage at every site.


rule bps_yaml:
    input:
        placement=ancient(LAYOUT.placement_table),
    output:
        submit_yaml=LAYOUT.submit_yaml("{site}", "{stage}", "{chunk}"),
    log:
        LAYOUT.rule_log("bps_yaml", "{site}", "{stage}", "{chunk}"),
    priority: stage_priority
    localrule: True
    script:
        "../scripts/bps_yaml.py"
