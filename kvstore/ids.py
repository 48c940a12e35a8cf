"""Typed identifiers shared by every layer. Pure: imports nothing from kvstore."""

from typing import NewType

NodeId = NewType("NodeId", str)
Term = NewType("Term", int)
LogIndex = NewType("LogIndex", int)
