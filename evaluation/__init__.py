"""Sample quality (classifier FID/KID/PR/IS), likelihood (bits/dim) and a quick evaluation for the app.

``quick_evaluate`` is imported on first use, so importing a submodule stays light.
"""


def __getattr__(name):
    if name in ("quick_evaluate", "QuickEvaluation"):
        from evaluation import quick

        return getattr(quick, name)
    raise AttributeError(f"module 'evaluation' has no attribute {name!r}")
