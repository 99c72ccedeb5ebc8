"""AMCT's file formats: config.json, the simplified .cfg and the record file."""
