import numpy as np
import pytest

from sdr_edge.data import load_source


def test_class_filter_keeps_and_relabels():
    full = load_source("builtin:digits", 8)
    sub = load_source("builtin:digits@7,3", 8)
    assert sub.label_names == ("7", "3")
    assert len(sub) == int(np.isin(full.labels, [7, 3]).sum())
    assert set(sub.labels.tolist()) == {0, 1}
    first7 = np.flatnonzero(full.labels == 7)[0]
    assert np.array_equal(sub.images[sub.labels == 0][0], full.images[first7])


def test_class_filter_errors_name_the_problem():
    with pytest.raises(ValueError, match="class indices"):
        load_source("builtin:digits@a,b", 8)
    with pytest.raises(ValueError, match="unknown class"):
        load_source("builtin:digits@3,12", 8)
