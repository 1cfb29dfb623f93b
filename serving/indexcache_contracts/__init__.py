"""What the operator and the serving side agree on, in one place both import: the F/S pattern rule
(`pattern`), the serve app's import path, builder arguments and user_config (`serve_app`), the
calibration result (`calibration`) and the serving metric names (`metrics`).

Pure Python and the standard library only: the operator image (no torch, no Ray) imports it."""
