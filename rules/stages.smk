# Step 5: every stage at every site that runs it, one BPS workflow per chunk of units,
# then one rule per stage and site (named <stage>_<site>) once all its chunks are verified.


rule run_stage:
    input:
        unpack(chunk_inputs),
    output:
        marker=LAYOUT.chunk_marker("{site}", "{stage}", "{chunk}"),
    log:
        LAYOUT.chunk_log("{site}", "{stage}", "{chunk}"),
    priority: stage_priority
    localrule: True
    script:
        "../scripts/run_stage.py"


for _stage in campaign.stages:
    for _site in campaign.stage_sites(_stage):

        rule:
            name:
                LAYOUT.stage_step(_site.name, _stage.name)
            input:
                chunks=TARGETS.chunk_markers(_site.name, _stage.name),
            output:
                marker=TARGETS.stage_marker(_site.name, _stage.name),
            log:
                LAYOUT.stage_log(_site.name, _stage.name),
            priority: TARGETS.priority(_stage.name)
            params:
                site=_site.name,
                stage=_stage.name,
            localrule: True
            script:
                "../scripts/finish_stage.py"
