"""Trained models applied: the library that the entry points share (nothing imports an entry point).

- `models`: load a segmenter or a classifier, segment a CT, score ROI cubes.
- `runs`: a training run's predictions on its validation fold(s) and on an external cohort.
- `validation`: external validation of one run or a sweep (metrics, figures, Grad-CAM, report).
- `system`: the exported system folder (segmenter, classifier(s), frozen threshold, preprocessing).
- `patient`: one new patient's CT through that system.
- `dicom`: its results as DICOM, for a PACS and a report (a SEG of the bodies, an SR of the findings).
"""

from ovcf.inference.models import load_classifier, load_segmenter, score, segment_ct
from ovcf.inference.system import System, export_system, load_system

__all__ = ["System", "export_system", "load_classifier", "load_segmenter", "load_system", "score", "segment_ct"]
