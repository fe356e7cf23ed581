"""Options shared by the verbs: template variables."""
from segaware_caffe import caffe_proto


def add_variable_arguments(parser):
    """--set VAR=value (repeatable) and --vars FILE, for ${VAR} templates of prototxts."""
    parser.add_argument("--set", "--var", dest="set", action="append", default=[],
                        metavar="VAR=value", help="value of a ${VAR} template variable (repeatable)")
    parser.add_argument("--vars", "--variables", dest="vars", metavar="FILE",
                        help="shell-style KEY=value file of template variables")


def parse_assignments(values, what):
    """{NAME: VALUE} from NAME=VALUE strings; `what` names the option in errors."""
    result = {}
    for value in values:
        name, sep, rest = value.partition("=")
        if not sep or not name:
            raise ValueError(f"{what} must look like NAME=VALUE, got {value!r}")
        result[name] = rest
    return result


def parse_variables(assignments, vars_file=None):
    """{name: value} from a KEY=value file, then --set VAR=value items (which win)."""
    variables = dict(caffe_proto.read_variables(vars_file)) if vars_file else {}
    variables.update(parse_assignments(assignments, "--set"))
    return variables


def variables_from(args):
    """The template variables given on the command line, or None."""
    return parse_variables(args.set, args.vars) or None
