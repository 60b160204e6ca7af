# Step 4: each site's BPS submit YAML for each stage.


rule bps_yaml:
    input:
        placement=f"{MARKERS}/placement/raws.tsv",
    output:
        submit_yaml=f"{BPS_DIR}/{{site}}/{{stage}}.yaml",
    log:
        f"{LOGS}/bps_yaml/{{site}}/{{stage}}.log",
    localrule: True
    script:
        "../scripts/bps_yaml.py"
