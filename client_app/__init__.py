"""ClientApp: the work done on each SuperNode."""
