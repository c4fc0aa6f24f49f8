"""Serving chunk policies: the websocket policy server (openpi's wire protocol)
and the robot-side runtime that runs a control loop while inference happens."""
