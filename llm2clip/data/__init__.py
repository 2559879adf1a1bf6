"""Data: the procedurally generated shapes world and readers for the formats real users have."""

from .readers import CaptionReader, DataConfig, Sample, SkipCounter
from .synth import SynthConfig, synthesize

__all__ = ["CaptionReader", "DataConfig", "Sample", "SkipCounter", "SynthConfig", "synthesize"]
