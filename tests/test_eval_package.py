"""``tcscale.eval`` exports the docs/DESIGN.md §4 entry points and stays light to import."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers.eval_models import REPO_ROOT


def test_import_is_light_and_entry_points_resolve():
    code = (
        "import sys, tcscale.eval as e\n"
        "from tcscale.eval import multigen_scores, frechet_distance\n"
        "import tcscale.eval.visor, tcscale.eval.compare, tcscale.eval.synthetic_scorer\n"
        "assert multigen_scores is tcscale.eval.multigen.multigen_scores\n"
        "assert frechet_distance is tcscale.eval.fid.frechet_distance\n"
        "assert sorted(e.__all__) == ['frechet_distance', 'multigen_scores']\n"
        "print(sorted(m for m in ('transformers', 'matplotlib', 'torch') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
