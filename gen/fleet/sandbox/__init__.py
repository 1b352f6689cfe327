"""Generated from specs/ by `make protos`; do not edit."""
