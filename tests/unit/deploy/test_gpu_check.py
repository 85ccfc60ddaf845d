"""deploy.gpu_check's own arguments: `--skip` takes checks out of the list, never `start`."""

from __future__ import annotations

import pytest

from deploy.gpu_check import skipped


def test_skip_takes_its_checks_out_and_leaves_the_run_fields():
    argv = ["--model.name", "tiny", "--skip", "run,update", "--learner.num-ranks", "2"]
    assert skipped(argv) == (["--model.name", "tiny", "--learner.num-ranks", "2"], {"run", "update"})
    assert skipped(["--model.name", "tiny"]) == (["--model.name", "tiny"], set())


@pytest.mark.parametrize("argv", [["--skip", "start"], ["--skip", "nap"], ["--skip"]])
def test_skip_refuses_what_it_cannot_skip(argv):
    with pytest.raises(SystemExit, match="--skip takes checks among broadcast, logprobs, update, run"):
        skipped(argv)
