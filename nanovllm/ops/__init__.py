"""The kernels. Each op is a plain-torch reference (the CPU backend and the
oracle in tests) and, where it pays, a Triton kernel with the same signature.
The public function of each module picks one by the device of its inputs."""
