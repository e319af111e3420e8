"""Reading a fine-tune: which SAE features did it push, by how much, and what are they?"""

from .activations import LatentStatistics, latent_statistics
from .contents import SpliceContents, load_contents
from .diff import AdapterDiff, diff_adapters
from .labels import dashboard_url, fetch_neuronpedia_labels, load_labels_file, load_neuronpedia_export
from .model_card import install_model_card_hook, model_card_section
from .render import FORMATS, render
from .report import FeatureRecord, feature_report
from .tracking import LatentTrackingCallback, plot_trajectories

__all__ = [
    "FORMATS",
    "AdapterDiff",
    "FeatureRecord",
    "LatentStatistics",
    "LatentTrackingCallback",
    "SpliceContents",
    "dashboard_url",
    "diff_adapters",
    "feature_report",
    "fetch_neuronpedia_labels",
    "install_model_card_hook",
    "latent_statistics",
    "load_contents",
    "load_labels_file",
    "load_neuronpedia_export",
    "model_card_section",
    "plot_trajectories",
    "render",
]
