"""The rim check of the TTA views and the head crop's margin (`make bench --what tta-subtypes`, issue 26) on real
slices of the mini set: at the default margin no view leaves intracranial tissue (where epidural and subdural bleeds
lie) out of the model's input; with no margin the views that move or zoom the image do."""

from __future__ import annotations

import pandas as pd

from ich_kaggle.bench import tta_subtypes
from ich_kaggle.core.config import DataConfig
from ich_kaggle.core.layout import Layout
from ich_kaggle.data import preprocess


def test_at_the_default_margin_no_view_cuts_intracranial_tissue(mini_dir, tmp_path):
    layout = Layout.of(mini_dir, tmp_path / "work")
    preprocess.ensure(layout)
    ids = pd.read_csv(layout.meta_csv).query("split == 'train'")["image_id"].astype(str).tolist()[::4]
    margin = DataConfig().crop_margin
    cut = tta_subtypes.pixel_check(layout, ids, margins=(0.0, margin))
    default = f"margin{round(margin * 100)}"
    for view in tta_subtypes.VIEWS:
        assert cut[f"rim_{default}_{view}_slices_with_intracranial_cut"] == 0.0, view
    for view in ("identity", "hflip"):  # they move no pixel out, at any margin
        assert all(cut[f"rim_margin0_{view}_{k}_pixels_cut"] == 0.0 for k in tta_subtypes.KINDS)
    # a tight box: the shifted and zoomed views lose the head's edge, skull and (shift_back, scale) brain included
    for view in ("shift", "shift_back", "scale"):
        assert cut[f"rim_margin0_{view}_head_pixels_cut"] > cut[f"rim_{default}_{view}_head_pixels_cut"] > 0.0
        assert cut[f"rim_margin0_{view}_slices_with_skull_cut"] > 0.0
    assert cut["rim_margin0_shift_back_slices_with_intracranial_cut"] > 0.0


def test_without_the_real_mini_set_the_bench_says_why_it_measures_nothing(synth_dir, capsys):
    tta_subtypes.bench_tta_subtypes(synth_dir)
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("tta-subtypes: skipped: needs the real mini set (")
