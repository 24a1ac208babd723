"""The step runner: on the forward thread, one step's block copies, its forward over the packed batch, and the
sampling of its draws. The engine and every tensor-parallel rank build it the same way (`Runner.build`)."""
