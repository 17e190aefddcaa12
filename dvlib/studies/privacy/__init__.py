"""The privacy audit (notebook 08): what a shared data vector reveals of a hospital's training images
(membership inference, :mod:`~dvlib.studies.privacy.attack`, run by :mod:`~dvlib.studies.privacy.audit`),
and hospitals that fine-tune under DP-SGD (:mod:`~dvlib.studies.privacy.dp`,
:mod:`~dvlib.studies.privacy.dp_steps`). Tables, sentences and figures from the result files alone:
:mod:`~dvlib.studies.privacy.report`, :mod:`~dvlib.studies.privacy.summary`,
:mod:`~dvlib.studies.privacy.figures`. DP-SGD needs the ``privacy`` extra (Opacus).
"""
