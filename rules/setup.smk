# Site repositories and, for the demo, the synthetic survey at the central site.


rule prepare_repo:
    output:
        marker=LAYOUT.repo_marker("{site}"),
    log:
        LAYOUT.rule_log("prepare_repo", "{site}"),
    localrule: True
    script:
        "../scripts/prepare_repo.py"


rule demo_survey:
    input:
        repo=LAYOUT.repo_marker(CENTRAL),
    output:
        marker=LAYOUT.survey_marker(),
    log:
        LAYOUT.rule_log("demo_survey"),
    script:
        "../scripts/demo_survey.py"
