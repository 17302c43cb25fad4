"""Running Triton: the embedded server (`embedded`: the real tritonserver of the nvidia-pytriton wheel on the CPU),
its supervisor (restarts on the same ports), hot swaps of RM versions (`hot_swap`), and ports. The models Triton runs
inside it are in templar.serving."""
