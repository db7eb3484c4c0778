"""A synthetic cohort in the exact CHAOS layout: real DICOM series (pydicom) and Ground PNGs.

``python -m preprocess.synthetic OUT_DIR --patients N [--modality mr|ct|both] [--seed S]`` writes::

    OUT_DIR/Train_Sets/CT/<patient>/DICOM_anon/i0000,0000b.dcm …   + Ground/liver_GT_000.png … (liver 255)
    OUT_DIR/Train_Sets/MR/<patient>/T1DUAL/DICOM_anon/{InPhase,OutPhase}/IMG-0004-000NN.dcm
                                    /T1DUAL/Ground/IMG-0004-000NN.png   (stems of the in-phase files)
    OUT_DIR/Train_Sets/MR/<patient>/T2SPIR/DICOM_anon/IMG-0002-000NN.dcm + T2SPIR/Ground/IMG-0002-000NN.png
    OUT_DIR/Test_Sets/…  the same without Ground (``--test-patients K``)

MR Ground gray values: liver 63, right kidney 126, left kidney 189, spleen 252. File numbering runs from head
to feet while ImagePositionPatient z *decreases* along it (as in the real CHAOS CT), so a reader that orders
slices by position instead of by file name visibly reverses them. In-phase Ground shares the in-phase stems
(pairing by stem); out-phase and CT names differ from their Ground names (pairing by position).

Modules, each importing only those listed before it: ``anatomy`` (tissues, shapes, the drawn patient),
``phantom`` (the patient on a grid), ``render`` (pixel values, Ground masks), ``dicom_writer`` (DICOM and PNG
files), ``cohort`` (spec, plan, patients, ``generate``), ``cli`` (``main``).
"""

from dlseg.synthetic.cli import main
from dlseg.synthetic.cohort import generate

__all__ = ["generate", "main"]
