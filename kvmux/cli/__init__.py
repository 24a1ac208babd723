"""The `kvmux` command line (`main`), the options its commands share (`options`), and `kvmux chat` (`chat`)."""
