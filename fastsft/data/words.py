"""A small built-in list of English words for the synthetic spelling tasks (no download needed).

Common words of 2 to 13 letters with many repeated letters, so that letter counts of 0 to 4 all occur.
The synthetic tasks add invented pronounceable words on top, so the vocabulary is not limited to this list.
"""

WORDS = tuple(dict.fromkeys(
    """
    apple banana cherry strawberry raspberry blueberry orange lemon melon mango papaya coconut pineapple grape
    tomato potato carrot pepper onion garlic cabbage broccoli spinach lettuce cucumber pumpkin zucchini avocado
    coffee butter cookie muffin noodle pizza pasta cheese yogurt cereal popcorn pancake waffle sausage biscuit
    house garden kitchen bedroom bathroom window ceiling balloon library mirror pillow blanket ladder hammer
    bottle kettle saucer teapot spoon needle scissors pencil notebook letter paper envelope stamp puzzle marble
    school teacher student lesson grammar spelling history science algebra geometry calculus chemistry physics
    mountain valley river desert forest meadow island volcano glacier canyon lagoon harbor bridge tunnel street
    rabbit squirrel kitten puppy giraffe elephant hippopotamus gorilla monkey donkey turtle parrot peacock eagle
    falcon sparrow pelican penguin dolphin octopus lobster mosquito beetle butterfly caterpillar grasshopper
    summer winter autumn spring morning evening tomorrow yesterday holiday weekend birthday calendar minute second
    happy silly jolly sunny rainy breezy sleepy hungry little middle bubble puddle giggle wiggle juggle paddle
    committee coffee address assessment necessary occasion possession success accommodate millennium mississippi
    tennessee bookkeeper balloonist banner cannon connection tattoo toffee voodoo woodpecker zookeeper
    umbrella vanilla chocolate caramel cinnamon ginger nutmeg sesame mustard vinegar honey syrup sugar pepperoni
    computer keyboard monitor printer program variable function integer pointer compiler terminal network server
    rocket planet comet galaxy nebula meteor asteroid telescope satellite orbit gravity eclipse horizon universe
    music guitar violin trumpet piano drummer cello banjo harmonica clarinet saxophone orchestra melody rhythm
    doctor nurse farmer baker painter sailor pilot plumber dentist lawyer barber butcher carpenter engineer
    yellow purple silver golden crimson scarlet indigo violet maroon turquoise emerald lavender
    bicycle tricycle scooter tractor trolley wagon carriage airplane helicopter submarine sailboat canoe
    attention tomorrow beginning committee parallel referral occurrence embarrass recommend aggressive
    abracadabra bookkeeping hullabaloo kerfuffle lollipop mammoth pepper possess razzmatazz shampoo tattletale
    """.split()
))  # dict.fromkeys: drop repeats, keep order
