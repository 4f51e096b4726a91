"""Typed settings shared by the web service, the DICOM listener and the workers."""

from config.settings import Destination, Settings, SettingsError

__all__ = ["Destination", "Settings", "SettingsError"]
