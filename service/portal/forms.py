"""The portal's forms (Flask-WTF: every one carries a CSRF token)."""

from __future__ import annotations

from typing import Any

from flask_wtf import FlaskForm
from wtforms import BooleanField, PasswordField, SelectField, StringField, TextAreaField
from wtforms.validators import DataRequired, Length, Optional

from pipeline.taxonomy import FRACTURE_TYPES

try:  # WTForms >= 3.3 deprecates (value, label) tuples
    from wtforms import SelectChoice
except ImportError:  # pragma: no cover - older WTForms
    SelectChoice = None


def choices(*pairs: tuple[str, str]) -> list[Any]:
    """Select options from ``(value, label)`` pairs, in whichever form this WTForms wants."""
    if SelectChoice is None:
        return list(pairs)
    return [SelectChoice(value, label) for value, label in pairs]


class LoginForm(FlaskForm):
    username = StringField("Username", validators=[DataRequired(), Length(max=64)])
    password = PasswordField("Password", validators=[DataRequired(), Length(max=256)])


class FeedbackForm(FlaskForm):
    verdict = SelectField("Your reading", choices=choices(("agree", "Agree with the AI result"),
                                                          ("disagree", "Disagree")), validators=[DataRequired()])
    fracture_present = SelectField("Fracture present?", choices=choices(("", "—"), ("yes", "Yes"), ("no", "No")),
                                   validators=[Optional()])
    correct_type = SelectField("Correct type", validators=[Optional()],
                               choices=choices(("", "—"), *[(t, t.replace("_", " ")) for t in FRACTURE_TYPES]))
    comment = TextAreaField("Comment", validators=[Optional(), Length(max=2000)])


class UserForm(FlaskForm):
    username = StringField("Username", validators=[DataRequired(), Length(max=64)])
    display_name = StringField("Display name", validators=[Optional(), Length(max=128)])
    role = SelectField("Role", choices=choices(("clinician", "Clinician"), ("admin", "Admin")))
    referring_physician_name = StringField("Referring physician name (DICOM Family^Given)",
                                           validators=[Optional(), Length(max=128)])
    password = PasswordField("Initial password (blank: generate one)", validators=[Optional(), Length(max=256)])


class UserEditForm(FlaskForm):
    display_name = StringField("Display name", validators=[Optional(), Length(max=128)])
    role = SelectField("Role", choices=choices(("clinician", "Clinician"), ("admin", "Admin")))
    referring_physician_name = StringField("Referring physician name", validators=[Optional(), Length(max=128)])
    is_active = BooleanField("Active")


class ApiKeyForm(FlaskForm):
    username = SelectField("Owner", choices=[])
    name = StringField("What it is for", validators=[DataRequired(), Length(max=128)])


class EmptyForm(FlaskForm):
    """A form with only its CSRF token (buttons that change something)."""
