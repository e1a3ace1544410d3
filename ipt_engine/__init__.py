"""ipt_engine: Intrinsic Prompt Tuning on a frozen language model.

The ML library of the IPT service: the backbone with per-row soft prompts, the task format, the intrinsic
subspace (Proj / Proj_b), prompt tuning (PT), multi-task subspace finding (MSF), intrinsic subspace tuning
(IST), metrics and the `ipt` CLI. It knows nothing of HTTP or Redis.
"""

__version__ = "0.1.0"
