# Step 5: every stage at every site that runs it, one BPS workflow per chunk of units,
# then one rule per stage and site (named <stage>_<site>) once all its chunks are verified.


rule run_stage:
    input:
        unpack(chunk_inputs),
    output:
        marker=f"{MARKERS}/stage/{{site}}/{{stage}}/{{chunk}}.json",
    log:
        f"{LOGS}/stage/{{site}}/{{stage}}/{{chunk}}.log",
    localrule: True
    script:
        "../scripts/run_stage.py"


for _stage in campaign.stages:
    for _site in campaign.stage_sites(_stage):

        rule:
            name:
                f"{_stage.name}_{_site.name}"
            input:
                chunks=chunk_markers(_site.name, _stage.name),
            output:
                marker=stage_marker(_site.name, _stage.name),
            log:
                f"{LOGS}/stage/{_site.name}/{_stage.name}.log",
            params:
                site=_site.name,
                stage=_stage.name,
            localrule: True
            script:
                "../scripts/finish_stage.py"
