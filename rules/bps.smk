# Step 4: the BPS submit YAML of every chunk of every stage at every site.


rule bps_yaml:
    input:
        placement=f"{MARKERS}/placement/raws.tsv",
    output:
        submit_yaml=f"{BPS_DIR}/{{site}}/{{stage}}/{{chunk}}.yaml",
    log:
        f"{LOGS}/bps_yaml/{{site}}/{{stage}}/{{chunk}}.log",
    localrule: True
    script:
        "../scripts/bps_yaml.py"
