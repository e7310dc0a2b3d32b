"""Pure array functions: no parameters, no Flax. Everything in bytescale's models is built from these."""
