"""Figures a person looks at: the training report and the run's index.html."""

from sdr_edge.report.html import Section, read_sections, update_index, write_index
from sdr_edge.report.montage import cluster_montage, montage_array
from sdr_edge.report.plots import (
    plot_cell_sizes,
    plot_code_histograms,
    plot_knn,
    plot_losses,
    plot_monitor,
    read_metrics,
)
from sdr_edge.report.training import make_training_report, rebuild_training_report

__all__ = [
    "Section",
    "cluster_montage",
    "make_training_report",
    "montage_array",
    "plot_cell_sizes",
    "plot_code_histograms",
    "plot_knn",
    "plot_losses",
    "plot_monitor",
    "read_metrics",
    "read_sections",
    "rebuild_training_report",
    "update_index",
    "write_index",
]
