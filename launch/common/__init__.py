"""What the entry points of launch/ share: a trained run's flags and argv (`run_flags`), the
cluster launchers' shell commands and flag parsing (`commands`), one worker per device
(`fanout`), a TPU VM's gcloud commands (`tpu_vm`) and its supervision (`tpu_supervisor`), the
pod launchers' compile check (`compile_check`) and a GKE JobSet of TPU slices (`jobset`)."""
