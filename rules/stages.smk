# Step 5: every stage at every site that runs it, one BPS submission each; a marker per unit.
# One rule per (stage, site), because each writes the markers of that site's own units.

for _stage in campaign.stages:
    for _site in campaign.stage_sites(_stage):

        rule:
            name:
                f"{_stage.name}_{_site.name}"
            input:
                **stage_inputs(_site.name, _stage.name),
            output:
                stage_unit_markers(_site.name, _stage.name),
            log:
                f"{LOGS}/stage/{_site.name}/{_stage.name}.log",
            params:
                site=_site.name,
                stage=_stage.name,
            localrule: True
            script:
                "../scripts/run_stage.py"
