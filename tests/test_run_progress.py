"""`sftmix run`'s stage lines: where the run is, the time so far and an estimate of the time left."""

from sftmix.recipes.run import RunProgress


def test_time_left_is_estimated_from_finished_stages_of_the_same_kind(capsys):
    now = [0.0]
    progress = RunProgress(["reference run and confidence split", "train ntp-seed1", "evaluate ntp-seed1",
                            "train sftmix-seed1", "evaluate sftmix-seed1"], clock=lambda: now[0])
    for stage, at in (("reference run and confidence split", 0), ("train ntp-seed1", 100),
                      ("evaluate ntp-seed1", 160), ("train sftmix-seed1", 180), ("evaluate sftmix-seed1", 250)):
        now[0] = at
        progress.start(stage)
    now[0] = 265
    progress.finish()
    assert capsys.readouterr().err.splitlines() == [
        "sftmix run [1/5] reference run and confidence split (0s so far)",  # nothing to estimate from yet
        "sftmix run [2/5] train ntp-seed1 (1m40s so far)",  # a training ~ the reference run; evaluation unknown
        "sftmix run [3/5] evaluate ntp-seed1 (2m40s so far)",
        "sftmix run [4/5] train sftmix-seed1 (3m00s so far, about 1m20s left)",  # 60 s training + 20 s evaluation
        "sftmix run [5/5] evaluate sftmix-seed1 (4m10s so far, about 20s left)",
        "sftmix run: all 5 stages done in 4m25s; writing the report",
    ]


def test_stages_that_were_up_to_date_do_not_count(capsys):
    now = [0.0]
    progress = RunProgress(["train a", "evaluate a", "train b", "evaluate b"], clock=lambda: now[0])
    for stage, at in (("train a", 0), ("evaluate a", 0.5), ("train b", 30), ("evaluate b", 90)):
        now[0] = at
        progress.start(stage)
    lines = capsys.readouterr().err.splitlines()
    assert lines[2] == "sftmix run [3/4] train b (30s so far)"  # the skipped training says nothing about the next
    assert lines[3] == "sftmix run [4/4] evaluate b (1m30s so far, about 30s left)"
