# Site repositories and, for the demo, the synthetic survey at the central site.


rule prepare_repo:
    output:
        marker=f"{MARKERS}/repos/{{site}}.json",
    log:
        f"{LOGS}/prepare_repo/{{site}}.log",
    localrule: True
    script:
        "../scripts/prepare_repo.py"


rule demo_survey:
    input:
        repo=f"{MARKERS}/repos/{CENTRAL}.json",
    output:
        marker=f"{MARKERS}/demo/survey.json",
    log:
        f"{LOGS}/demo_survey.log",
    script:
        "../scripts/demo_survey.py"
